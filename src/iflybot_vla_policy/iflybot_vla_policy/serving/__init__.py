"""Remote inference: openpi-compatible wire format, websocket policy server, server process."""

# The contract between `iflybot serve` and whoever starts it (serving.process.ServerProcess):
# the environment variable the API key is read from (not the command line, which other users
# see), and the line printed once the server listens, followed by its URI.
API_KEY_ENV = 'IFLYBOT_API_KEY'
READY_PREFIX = 'iflybot serve: listening on '
# Observation and reply conventions a remote policy server may speak: ours (the policy's own keys
# and units) or openpi's DROID (serving/droid.py maps both ways).
WIRE_FORMATS = ('iflybot', 'droid')
