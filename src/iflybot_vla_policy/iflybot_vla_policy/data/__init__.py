"""Demonstration data without ROS: bags, episode recording, LeRobot v3.0 datasets.

- `bags`: rosbag2 MCAP bags through `rosbags` (our interfaces registered from their .msg files);
  `bag_repair`: recover a bag cut off by a crash.
- `episode_recorder`: serialized messages -> one finalised bag per episode (bounded queue,
  writer thread, drop counts, episodes.jsonl index); the recorder node wraps it.
- `convert`: bag -> aligned frames (state, commanded actions, images) -> `EpisodeData`.
- `lerobot_format`, `lerobot_writer`, `lerobot_reader`, `video`: the dataset format.
- `loader`: torch Datasets (action chunks, frame pairs) that training uses.
- `vqa`: spatial question-answer pairs from the simulator's ground truth (training's module).
"""
