"""Error events: one per trigger status, from the kernel's ring buffer to the operator.

The classifier hands each trigger response to user space with the request it answered
(struct error_event: mirror.abi). One module per step:
  record.py  decoding a ring-buffer record (`Event`), naming the request it carries, and
             the event's JSON object (time, iface, direction, client, server, method,
             target, host, status, response_ns, new_flow, proto, ...);
  stream.py  the reader thread (`EventStream`): counts, the response-time histogram, the
             recent events `mirror events` asks for, and hands each event to:
  file.py    the events file (`--events-file PATH`, mode 0600, one rotation; `-`: stdout);
  frames.py  the request frame written onto the debug interface (AF_PACKET), so that the
             capture holds the request of every error response;
  follow.py  `mirror events`: the client that asks the running controllers.

The reader never slows the datapath: the kernel side never waits on a full ring buffer
(the event is lost and counted in the `events_lost` counter)."""
