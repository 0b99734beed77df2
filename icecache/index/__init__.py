"""DCI-tree index over keys, batched over KV heads."""

from icecache.index.select import select_pages
from icecache.index.tree import PageLayout, PrivatePages, TreeIndex, build_tree

__all__ = ["PageLayout", "PrivatePages", "TreeIndex", "build_tree", "select_pages"]
