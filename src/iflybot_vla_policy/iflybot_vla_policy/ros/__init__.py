"""Thin rclpy nodes: they convert messages, call the core and publish.

This is the only package of iflybot_vla_policy that imports rclpy or ROS messages.
"""
