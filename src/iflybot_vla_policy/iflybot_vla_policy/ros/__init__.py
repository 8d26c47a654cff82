"""Thin rclpy nodes: they convert messages, call the core and publish. Only this package imports rclpy."""
