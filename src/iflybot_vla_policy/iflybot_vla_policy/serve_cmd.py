"""`iflybot serve`: run the policy on this machine for remote clients (openpi's protocol)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from iflybot_vla_policy.serving import API_KEY_ENV, READY_PREFIX


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', metavar='DIR', help='trained checkpoint directory')
    source.add_argument('--preset', metavar='NAME',
                        help="model preset with random weights, for testing (e.g. 'tiny')")
    parser.add_argument('--noise-scale', type=float, default=None,
                        help="std of the policy's flow starting noise in [0, 1]: 1 samples, 0 "
                             "is deterministic (less jitter); default: the checkpoint's "
                             'bundle.yaml inference.noise_scale, else 1')
    parser.add_argument('--seed', type=int, default=0,
                        help='weight seed for --preset; also seeds the sampling noise')
    parser.add_argument('--device', default='auto',
                        help="torch device for inference: 'auto' (cuda if available), 'cpu', "
                             "'cuda', 'cuda:1', ...")
    parser.add_argument('--host', default='127.0.0.1',
                        help="address to bind; '0.0.0.0' exposes the server to the network "
                             '(use an API key then)')
    parser.add_argument('--port', type=int, default=8000, help='TCP port; 0 picks a free one')
    # default None, resolved in run(): --help must never print a key taken from the environment
    parser.add_argument('--api-key', default=None,
                        help='require "Authorization: Api-Key <key>" from clients; if not given, '
                             f'${API_KEY_ENV} is used (prefer it: command lines are visible to '
                             'other users)')
    parser.add_argument('--max-message-mb', type=float, default=32.0,
                        help='largest request accepted, in MiB')
    parser.add_argument('--max-batch', type=int, default=8,
                        help='most concurrent requests run as one batch (1: no batching)')
    parser.add_argument('--log-level', default='info',
                        choices=('debug', 'info', 'warning', 'error'))


def _is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warm_up(policy) -> None:
    """One forward pass before the first client (allocator, CUDA context, kernel selection).

    It draws its noise from a fixed seed, not the policy's generator, so the answers clients get
    are the same as from a fresh Policy in-process.
    """
    import numpy as np

    from iflybot_vla_policy.config import ROBOT_STATE_DIM

    size = policy.cfg.image_size
    obs = {'images': {cam: np.zeros((size, size, 3), np.uint8) for cam in policy.cfg.cameras},
           'state': np.zeros(ROBOT_STATE_DIM, np.float32), 'instruction': 'warm up'}
    policy.infer(obs, seed=0)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    logging.getLogger('websockets').setLevel(logging.WARNING)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    from iflybot_vla_policy.bundle import noise_scale
    from iflybot_vla_policy.policy import Policy
    from iflybot_vla_policy.serving.server import PolicyServer, ServerConfig, run_server

    try:
        config = ServerConfig(host=args.host, port=args.port, api_key=api_key,
                              max_message_bytes=int(args.max_message_mb * 2**20),
                              max_batch=args.max_batch)
    except ValueError as exc:
        print(f'iflybot serve: {exc}', file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and api_key is None:
        logging.warning('serving on %s without an API key: anyone on the network can drive '
                        'this policy (set --api-key or $%s)', args.host, API_KEY_ENV)
    device = args.device
    if device == 'auto':
        import torch

        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        if args.checkpoint:
            policy = Policy.from_checkpoint(args.checkpoint, seed=args.seed, device=device,
                                            noise_scale=args.noise_scale)
        else:
            policy = Policy.from_config(args.preset, seed=args.seed, device=device,
                                        noise_scale=noise_scale(None, args.noise_scale))
    except (FileNotFoundError, ValueError) as exc:   # bad directory, unknown preset
        print(f'iflybot serve: cannot load the policy: {exc}', file=sys.stderr)
        return 2

    try:
        _warm_up(policy)
    except Exception as exc:   # a policy that cannot answer a plain observation is not served
        print(f'iflybot serve: warm-up inference failed: {type(exc).__name__}: {exc}',
              file=sys.stderr)
        return 1
    logging.info('policy %s ready on %s', policy.cfg.name, device)

    def ready(server: PolicyServer) -> None:
        print(f'{READY_PREFIX}{server.uri}', flush=True)

    try:
        return run_server(policy, config, on_ready=ready)
    except OSError as exc:   # typically: the port is taken
        print(f'iflybot serve: cannot listen on {args.host}:{args.port}: {exc}', file=sys.stderr)
        return 1
