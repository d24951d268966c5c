"""hybrid: hierarchical hybrid VLA-WAM robot policies."""
