"""autopose.data"""
