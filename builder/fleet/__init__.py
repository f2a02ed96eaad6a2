"""Fleet rebuilds: when a base image is released, which customers it reaches (fleetfile,
plan), building them all (build_all), the GitLab child pipeline (gitlab); the release
records they write are the record stage (:mod:`builder.record`).
"""
