"""The TUI's screens: the chat, the help screen, and small modal prompts."""
