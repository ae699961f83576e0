"""autopose.augment"""
