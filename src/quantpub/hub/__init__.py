"""A local server for the Hugging Face Hub HTTP API, web pages and git: ``quantpub hub serve``."""

from quantpub.hub.auth import Users, load_or_create_users, read_users
from quantpub.hub.server import HubConfig, HubServer, serve, start_in_thread

__all__ = ["HubConfig", "HubServer", "Users", "load_or_create_users", "read_users", "serve", "start_in_thread"]
