"""Book-keeping's layer rules, one file per layer type; importing this package registers them
(:mod:`veil.privacy.bk.registry`). A new layer type is one ``@register``-ed function in one new file here, imported
below."""

from veil.privacy.bk.layers import embedding, linear, other

__all__ = ["embedding", "linear", "other"]
