"""Bring-up of the iFlyBot-VLA stack: node graphs, launch helpers and the graph runner."""
