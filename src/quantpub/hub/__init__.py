"""A local server for the Hugging Face Hub HTTP API: ``quantpub hub serve``."""

from quantpub.hub.server import HubConfig, HubServer, read_tokens, serve, start_in_thread

__all__ = ["HubConfig", "HubServer", "read_tokens", "serve", "start_in_thread"]
