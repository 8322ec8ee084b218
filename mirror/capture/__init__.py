"""The capture sidecar (`mirror capture`) and what reads captures back.

- command: the `mirror capture` command line, and `--list`;
- sidecar: the sidecar's life: waits for the debug interface, runs tcpdump into a ring,
  feeds the indexer, writes status.json, stops cleanly;
- tcpdump: tcpdump as a child process (the one wrapper the sidecar, the demo, the bench
  and the tests use);
- ring: the ring's files on disk;
- pcap: the pcap file format: its headers and records, read whole or incrementally
  (as tcpdump appends), and written;
- flow: a connection as the capture sees it: the TCP packets of its frames, read by
  sequence number; a whole pcap read back into packets and flows (demo, bench, tests);
- index: the index of error flows (index.jsonl), read incrementally from the pcaps;
- request: HTTP/1.x request heads as captured (perhaps cut), and which request a
  response answered (by acknowledgement number);
- reorder: a closed ring file rewritten with each request before the error response it
  got (the controller writes the request after the response);
- metrics: the sidecar's Prometheus collector."""
