"""The capture sidecar (`mirror capture`) and what reads captures back.

- command: the `mirror capture` command line, `--list`, and the other modes' options;
- sidecar: the sidecar's life: waits for the debug interface, runs tcpdump into a ring,
  feeds the indexer, writes status.json, stops cleanly;
- tcpdump: tcpdump as a child process (the one wrapper the sidecar, the recording, the
  demo, the bench and the tests use);
- ring: the ring's files on disk;
- pcap: the capture file formats: pcap's headers and records, read whole, incrementally
  (as tcpdump appends) or from a pipe, and written; pcapng written;
- flow: a connection as the capture sees it: the TCP packets of its frames, read by
  sequence number, within bounds; a whole pcap read back into packets and flows (demo,
  bench, tests);
- index: the index of error flows (index.jsonl), read incrementally from the pcaps,
  bounded in memory and on disk;
- request: HTTP/1.x request heads as captured (perhaps cut), and which request a
  response answered (by acknowledgement number);
- reorder: a closed ring file rewritten with each request before the error response it
  got (the controller writes the request after the response), and the same on a stream
  (Holder);
- record: `mirror capture -w`: the debug interface into one pcapng, requests first;
- extract: `mirror capture --extract`: the matching connections of the ring into one
  pcapng;
- annotate: what those pcapng files say of each connection, and text made safe for a
  terminal;
- metrics: the sidecar's Prometheus collector."""
