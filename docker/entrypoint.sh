#!/usr/bin/env bash
# Source ROS 2 Jazzy, franka_ros2 and this workspace, then run the command (default: sim launch).
set -e
# shellcheck disable=SC1091
source /opt/ros/jazzy/setup.bash
# shellcheck disable=SC1091
source /opt/franka_ws/install/setup.bash
# shellcheck disable=SC1091
source /opt/iflybot_ws/install/setup.bash
exec "$@"
