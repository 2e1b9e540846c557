"""Data loading for diffcap: the caption/feature contract and dataset builders."""
