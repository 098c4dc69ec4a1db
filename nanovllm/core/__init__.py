"""The device-agnostic core: it never imports a backend."""
