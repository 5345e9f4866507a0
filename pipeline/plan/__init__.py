"""plan=true: the planning step that replaces streaming, its text summary, and the capacity table across
planned runs. Orchestration: it asks the stream stage for its memory model."""
