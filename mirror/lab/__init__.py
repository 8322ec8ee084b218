"""The demo (`mirror lab`) and the test hosts it shares with the tests and the bench:
network namespaces joined to the host by veth pairs (netns), nginx in them (nginx), and
HTTP clients whose connections can be found in a capture (client)."""
