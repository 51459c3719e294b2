"""What a worker does before the analysis, in the worker process: the slide's metadata,
thumbnail and label, the streamed resumable download (single file or multipart), safe
file names, and the DZI maths shared with the simulator."""
