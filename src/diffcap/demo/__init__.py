"""`diffcap demo`: a synthetic world of coloured shapes, captioned end to end offline.

scenes (the world and its ground truth) -> render (images) -> captions (references) -> dataset (the
split data set and its contract files) -> run (train, caption, score) with scoring (what a caption names).
"""
