"""Datasets: `shapes` (procedural captioned videos of moving coloured shapes) and its analyser `analysis`."""
