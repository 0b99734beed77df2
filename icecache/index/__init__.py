"""DCI-tree index over keys, batched over KV heads."""

from icecache.index.tree import PageLayout, PrivatePages, TreeIndex, build_tree, select_pages

__all__ = ["PageLayout", "PrivatePages", "TreeIndex", "build_tree", "select_pages"]
