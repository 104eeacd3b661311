"""The Textual terminal UI, installed as `edgectx.tui`: `edgectx` in a terminal (or `edgectx tui`) opens it.

app.py holds the App and its bindings, screens/ the chat, help and dialog screens, widgets/ the sidebar,
transcript, prompt, progress row and status bar; bridge.py is the one place that calls the engine and the store.
"""
