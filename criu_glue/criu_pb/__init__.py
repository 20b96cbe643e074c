"""CRIU's image messages (generated at build from the vendored .proto files; see VENDORED.md)."""
