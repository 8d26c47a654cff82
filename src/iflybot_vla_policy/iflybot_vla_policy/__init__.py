"""iFlyBot-VLA for ROS 2: the ROS-free core (model, engine, safety, data, sim, eval).

Nothing imported from here pulls in rclpy; the ROS nodes live in ``iflybot_vla_policy.ros``.
"""

__version__ = '0.1.0'
