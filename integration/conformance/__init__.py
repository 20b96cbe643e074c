"""make conformance: critest against a pyshim daemon of its own, with stand-in images."""
