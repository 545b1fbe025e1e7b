include $(sort $(wildcard $(BR2_EXTERNAL_DEPARROW_PATH)/package/*/*.mk))
