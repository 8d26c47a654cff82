"""The policy node's logic as a plain library (no rclpy): supervisor (run/hold state machine),
freshness (which inputs a run may plan from), requests (when to ask for a chunk), stats, the
inference worker, and `PolicyRuntime`, the facade the ROS node wires to topics and timers."""
from iflybot_vla_policy.runtime.config import MAX_INSTRUCTION_CHARS, NodeConfig, parse_config
from iflybot_vla_policy.runtime.runtime import Goal, GoalUpdate, Outputs, PolicyRuntime, Request
from iflybot_vla_policy.runtime.supervisor import HoldCause, RunState

__all__ = ['MAX_INSTRUCTION_CHARS', 'Goal', 'GoalUpdate', 'HoldCause', 'NodeConfig', 'Outputs',
           'PolicyRuntime', 'Request', 'RunState', 'parse_config']
