"""The TUI's widgets: each reports outward through nested Message classes and never touches the engine."""
