"""Entry points: `meshd`, `meshctl`, the demo, and log setup (used only by entry points)."""
