"""What the tests share: processes and servers on real sockets, the CLI runner, stacks of services."""
