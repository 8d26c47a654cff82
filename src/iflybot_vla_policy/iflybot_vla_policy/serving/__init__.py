"""Remote inference: openpi-compatible wire format, websocket policy server, server process."""
