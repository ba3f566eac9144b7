"""Model cards for the published repos: templates plus recorded facts."""

from quantpub.card.render import render, render_run

__all__ = ["render", "render_run"]
