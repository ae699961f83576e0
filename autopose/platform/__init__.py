"""autopose.platform"""
