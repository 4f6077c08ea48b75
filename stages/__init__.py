"""One module per pipeline stage; each exposes ``run(config) -> result`` on a frozen config."""
