"""Input pipeline: sources, transforms, batching."""
