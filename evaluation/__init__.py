"""Retrieval evaluation: mAP / CMC / mINP under the Market-1501 and VehicleID protocols, k-reciprocal
re-ranking, distances and feature files. Depends on nothing else of ours.
"""
