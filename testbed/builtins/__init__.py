"""Built-in components: ordinary plugins, registered through the `testbed` entry points."""
