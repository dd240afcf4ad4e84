"""Build tools that assemble the fork from upstream Keras at build time."""
