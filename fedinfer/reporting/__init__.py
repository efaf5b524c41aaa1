"""Run outputs: results.json, plots, terminal progress, sweep summaries."""
