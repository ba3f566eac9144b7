"""Model cards for the published repos: templates plus recorded facts."""

from quantpub.card.render import read_source, render, render_run

__all__ = ["read_source", "render", "render_run"]
