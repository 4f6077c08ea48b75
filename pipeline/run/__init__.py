"""The pipeline runner's machinery: the YAML spec and the stage graph."""
