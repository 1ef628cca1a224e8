"""The ``tokenrelay`` command: run the API, a worker, a dev stack, or a terminal client."""
