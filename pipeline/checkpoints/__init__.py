"""Checkpoint folders: finding one (local, hub, synthetic, packaged), checking its headers, writing synthetic
ones. Stages may import it; it imports only the core."""
