"""autopose.models"""
