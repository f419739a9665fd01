"""Downstream lesion segmentation: sliding-window inference, AutoPET metrics, evaluation."""
