"""Built-in components: ordinary plugins, registered through the `testbed` entry points
(the modules pyproject.toml names), and the helper modules those plugins share."""
