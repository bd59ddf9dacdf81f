"""Publishers that turn folders of images into lookstream events on Kafka."""
