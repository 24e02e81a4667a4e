"""ssl-segbench: how good are a backbone's patch features for semantic segmentation when no labels are used?

Data flows one way: dataset → transform → backbone → features (cached) → protocol → label maps → metrics → record →
leaderboard; each stage is one module (data/, transforms, backbones/, features, protocols/, metrics, records,
leaderboard), and runner.py is where they meet.
"""
__version__ = "0.1.0"
