"""worklist package."""
