"""Process-level services: the device mesh and shardings, compilation cache, host memory, stop requests, the metrics writer, the workdir lock."""
